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
# Every public header, less those of layers that are not installed (the server is not part of
# the package; model-layer headers only when the model is built).
file(GLOB ROPEKIT_PUBLIC_HEADERS CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/include/ropekit/*.h)
set(ROPEKIT_UNINSTALLED_HEADERS serve.h)
if(NOT ROPEKIT_BUILD_MODEL)
  list(APPEND ROPEKIT_UNINSTALLED_HEADERS model.h study.h distributed.h)
endif()
list(TRANSFORM ROPEKIT_UNINSTALLED_HEADERS PREPEND ${PROJECT_SOURCE_DIR}/include/ropekit/)
list(REMOVE_ITEM ROPEKIT_PUBLIC_HEADERS ${ROPEKIT_UNINSTALLED_HEADERS})
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
