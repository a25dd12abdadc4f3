# Install rules and the CMake package `ropekit`:
#   find_package(ropekit REQUIRED COMPONENTS core)        -> ropekit::core
#   find_package(ropekit REQUIRED COMPONENTS model study) -> ropekit::model, ropekit::study
# Static libraries carry their private dependencies into the consumer's link line, so the
# package config finds them again (Highway, nlohmann-json, Threads; OpenBLAS and zlib for model
# and study).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(ROPEKIT_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/ropekit)

install(TARGETS ${ROPEKIT_EXPORTED_TARGETS} EXPORT ropekitTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT dev
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
set(ROPEKIT_PUBLIC_HEADERS error.h hf_config.h position_encoding.h rope.h thread_pool.h)
if(ROPEKIT_BUILD_MODEL)
  list(APPEND ROPEKIT_PUBLIC_HEADERS model.h study.h)
endif()
list(TRANSFORM ROPEKIT_PUBLIC_HEADERS PREPEND ${PROJECT_SOURCE_DIR}/include/ropekit/)
install(FILES ${ROPEKIT_PUBLIC_HEADERS}
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/ropekit COMPONENT dev)
install(EXPORT ropekitTargets NAMESPACE ropekit:: DESTINATION ${ROPEKIT_CMAKE_DIR}
  COMPONENT dev)

set(ROPEKIT_PACKAGE_COMPONENTS core)
if(ROPEKIT_BUILD_MODEL)
  list(APPEND ROPEKIT_PACKAGE_COMPONENTS model study)
endif()
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/ropekitConfig.cmake.in
  ${PROJECT_BINARY_DIR}/ropekitConfig.cmake INSTALL_DESTINATION ${ROPEKIT_CMAKE_DIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/ropekitConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/ropekitConfig.cmake
  ${PROJECT_BINARY_DIR}/ropekitConfigVersion.cmake
  DESTINATION ${ROPEKIT_CMAKE_DIR} COMPONENT dev)
